"""Integrations with training frameworks.

* :mod:`sassha_dist.integrations.transformers`: ``--optim sassha`` for the Hugging Face
  ``Trainer`` (``SasshaTrainingArguments``, ``SasshaTrainer``).
* :mod:`sassha_dist.integrations.embedded`: the download-free default tokenizer, corpus and
  tiny GPT-2 of the causal-LM job ``integrations/run_clm.py``.

Both need the ``transformers`` extra (``pip install -e ".[transformers]"``); importing
this package alone does not import transformers.
"""
