"""The code location: `dagster dev` (see workspace.yaml) loads `defs` from here."""

from synthvlm_assets.defs.build import Settings, build_definitions

defs = build_definitions(Settings.from_env())
