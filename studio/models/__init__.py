"""The base model: resolving a name to a folder (hub, local, embedded), and loading it."""
