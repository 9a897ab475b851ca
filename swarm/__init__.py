"""The swarm: DHT join, records and validators, claims, blob transfer, published checkpoints, and
the swarm roles (trainer, preparer, server, client, status, a local swarm). Beside ``evaluation``."""
