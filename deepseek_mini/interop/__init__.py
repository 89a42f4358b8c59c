"""Adapters to other ecosystems, one way: they import the model, the model never imports them.

* hf.py          transformers' DeepseekV2 layout: safetensors + tokenizer export and import (the API)
* hf_config.py   its config.json <-> ModelConfig translation and refusals
"""
