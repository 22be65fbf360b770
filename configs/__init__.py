"""YAML presets (model sizes, later training stages and engine settings), installed as `lyra.configs`."""
