"""Data: packing, the demo datasets, the training batches and the Fourier stage; DALI pipelines in
:mod:`.pipeline` and :mod:`.loader` only, imported where pipelines are built (DALI is an extra)."""
