"""Files: reading and writing checkpoints (isocompress's own, the reference layout, safetensors), importing live
modules, converting notebook caches, data arrays, and publishing a run's outputs all-or-nothing."""
