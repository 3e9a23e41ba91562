"""Genre packs: visual styles, LoRA stack composition, world content and prompts, by job.

    schema         the files as msgspec structs; errors name the file and the path in it
    compose        the rules between a genre's and a world's visual_style.yaml (pure)
    prompts        content items to prompts: triggers, visual_prompt or name+description, tier suffix
    load           reading packs from disk
    errors         PackError, VisualStyleError, VisualStyleWarning
    example_loras  the example packs' tiny-preset LoRA files (numpy: imported only when asked for)

Importing this package loads no numpy, MLX or BLAS: a client composing a stack stays light.
"""

from client.packs.compose import (
    ComposedStack,
    LoraEntry,
    StyleDoc,
    VisualStyle,
    compose_lora_stack,
    compose_style,
    merge_fields,
    migrate_flat,
    resolve_lora_args,
)
from client.packs.errors import PackError, VisualStyleError, VisualStyleWarning
from client.packs.load import genre_dir, genre_dirs, load_items, load_visual_style, pack_name, world_names
from client.packs.prompts import ContentItem, apply_triggers, base_prompt, compose_prompt

__all__ = [
    "ComposedStack",
    "ContentItem",
    "LoraEntry",
    "PackError",
    "StyleDoc",
    "VisualStyle",
    "VisualStyleError",
    "VisualStyleWarning",
    "apply_triggers",
    "base_prompt",
    "compose_lora_stack",
    "compose_prompt",
    "compose_style",
    "genre_dir",
    "genre_dirs",
    "load_items",
    "load_visual_style",
    "merge_fields",
    "migrate_flat",
    "resolve_lora_args",
    "pack_name",
    "world_names",
]
