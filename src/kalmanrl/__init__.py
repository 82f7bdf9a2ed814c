"""kalmanrl: GRPO, KRPO and KPO for language-model reasoning, from data to report."""

__version__ = "0.1.0"
