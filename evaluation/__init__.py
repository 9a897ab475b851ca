"""Quality measurement: FID with the packaged Inception network and ``--role eval``. Beside
``swarm`` (neither imports the other); imports ``training`` and everything below it."""
