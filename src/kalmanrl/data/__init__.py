"""Problems and how answers are judged: the dataset schema, raw sources, the loaders (a registry) and
decontamination, gold answers, the arithmetic generator, prompt templates and the rewards. Imports `core` and
`runtime`."""
