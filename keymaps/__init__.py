"""Package data only: the versioned YAML keymaps (formats/, models/, remap keymaps) shipped in the wheel.

Read them through `client.lorafile.keymaps.shipped_keymap_dir()`; edit them as YAML files here.
"""
