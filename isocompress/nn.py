"""`isocompress.nn`, kept for scripts written against earlier versions: the training modules live in
`isocompress.train.nn`."""

from isocompress.train.nn import IsotropicLayer, IsotropicMLP, IsotropicTanh  # noqa: F401
