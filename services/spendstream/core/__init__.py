"""Code every spendstream service shares: events, the Avro codec, configuration, topic names.

Nothing in here imports a service; every service imports from here.
"""
