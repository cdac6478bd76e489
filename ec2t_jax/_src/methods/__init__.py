"""Train-time ternarization methods other than EC2T (TWN, TTQ, STTN, Faraone et al.)."""
