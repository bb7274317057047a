"""lbt's Hydra launchers (presets src/lbt/conf/hydra/launcher/slurm.yaml and local_gpus.yaml), in launchers.py.

They live in the `hydra_plugins` namespace because Hydra instantiates launchers only from there. Hydra
imports every plugin module when it starts, so they stay light: no torch, no lbt import at load.
"""
