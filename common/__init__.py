"""Small helpers shared by train and infer that are not data (those live in shards)."""
