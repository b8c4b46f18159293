"""The code location: `dagster dev` (see workspace.yaml) loads `defs` from here, with the settings of its
environment (SYNTHVLM_*, read in defs/settings.py: the same as `synthvlm` and the compose stack)."""

from synthvlm_assets.defs.build import Settings, build_definitions

defs = build_definitions(Settings.from_env())
