"""The swarm roles, built on the mechanisms in ``swarm``: the trainer, the preparer's serving side
(``prepare --serve``), the expert server, the client, the status dashboard and a whole local swarm."""
