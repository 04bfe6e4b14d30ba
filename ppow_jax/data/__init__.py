"""Input pipeline: local corpora as TFDS datasets, tokenizers and chat templates, packing.

Modules (imported one by one, so light users need not load TFDS or grain):

* ``corpus`` -- a local corpus's files and their hashed train/held-out split.
* ``builders`` -- ``TextCorpus``/``Conversations`` TFDS builders over local files,
  ``prepare``, ``load_prepared`` (offline).
* ``tokenizer`` -- byte-level BPE training, ``tokenizer.json`` I/O, chat templates with an
  assistant mask.
* ``pipeline`` -- tokenise, pack, shuffle, shard per host, batch; a checkpointable iterator;
  the hook that regenerates responses with the target.
* ``prompts`` -- JSONL conversation records and evaluation prompt files.
* ``instructions`` -- requests synthesized from the standard library for self-distillation.
* ``benchmarks`` -- evaluation prompt sets (HumanEval, the shipped chat set).
"""
