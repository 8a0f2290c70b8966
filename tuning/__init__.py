"""Search spaces of `cxrkeras tune`, one TOML file per study (data, not code); installed as cxrkeras.studies."""
