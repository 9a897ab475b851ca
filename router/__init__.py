"""The router and routed inference: the router network, the combination rule, routed sampling,
the trained set (load, export) and the client's core. Imports ``data`` and ``experts``."""
