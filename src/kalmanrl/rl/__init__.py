"""The algorithms' mathematics: the scalar Kalman filter and the registered advantage estimators, ratio transforms,
surrogates and loss aggregates. Imports `core` (and `runtime`, `data`) only."""
