"""What a LoRA file says, in pure numpy: read it (safetensors only), recognise its format from its keys
and metadata through the versioned keymaps, resolve it onto a model's layer layout as exact terms, and
account for every key (the per-file report).

Both sides use it: the daemon applies the terms to the live model; the LoRA tools inspect and remap.
"""
