"""What is stored and hashed: sources, prepare (embed, cluster, shards), the manifest, streaming
batches, checkpoints (format, save, verify, load). Imports only ``experts``."""
