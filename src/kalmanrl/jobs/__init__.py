"""What each workflow job runs: the warm start (`sft`), RL training (`trainer`, `checkpoint`), evaluation, what
training and evaluation share (`stage`), and the memory plan of a config's jobs. The top layer below the CLI."""
