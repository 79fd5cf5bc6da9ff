"""`isocompress check`: CI limits on parameters, bytes and errors (config, measurement, baseline, formatting)."""
