"""Adapters to other ecosystems, one way: they import the model, the model never imports them.

* hf.py   transformers' DeepseekV2 layout: config.json + safetensors export and import
"""
