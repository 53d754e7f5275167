"""The bundle format, the contract between `export` (which writes bundles) and the workers and
the frontend (which load them): `format` reads and writes `manifest.json`, `config` is the model's
architecture, `recipes` how each weight role is stored."""
