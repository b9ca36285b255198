"""The learning room: the recommender model, local training, and the one-pass DP-SGD path."""
