"""The swarm's mechanisms: DHT join, identity, records and validators, the claim rule, checkpoint
verification, local bans, blob transfer, published checkpoints and mirrors, and the denoising wire
format. The roles that use them live in ``roles``. Beside ``evaluation``."""
