"""The commands, the top of the package (console scripts in pyproject.toml):

    train.py    `train`: the start-up (before Keras), the job (job.py), and how it ended
    predict.py  `predict`: a finished model's star ratings for reviews, as JSON Lines

May import every other package.
"""
