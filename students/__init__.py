"""A reference vertical model (a "student") that learns from GEM's knowledge.

config.py     which features, surfaces and sizes the vertical model has (YAML)
variants.py   which knowledge it uses: hard, kd, aux, adapted, repr, share, all
knowledge.py  `gem embed`'s output joined to logged rows by example_id (pyarrow)
model.py      the DLRM-style student: embeddings, pairwise dots, top MLP, two heads
share.py      parameter sharing: FM embedding tables taken by name from a checkpoint
losses.py     hard, distillation (serving head) and auxiliary-head (ExFM) losses
train.py      training on logged Parquet, metrics on the time-ordered test slice
cli.py        `gem student train`
"""
