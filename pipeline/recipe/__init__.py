"""One `roi run`, top to bottom: its inputs, each arm's model, the run itself and its cached stages."""
