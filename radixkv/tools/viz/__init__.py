"""Pictures of a real `RadixCache` and its `TokenToKVPool`, one module per kind of picture:

- `format_tree` (from `radixkv.memory.tree_text`): the text tree `RadixCache.pretty()` returns;
- `dot.to_dot`: the same tree as Graphviz DOT; `png.render_tree_png`: a PNG drawn with matplotlib;
- `memory_map`: which pool slot belongs to which tree node or running request, which are free;
  `format_memory_map` and `png.render_memory_map_png` draw it;
- `demo.build_demo` / `pictures.write_pictures`: what `radixkv viz` does: a tree built by the
  real scheduler from a few chat prompts, and every picture of it written to a folder.

Nodes are named n1, n2, ... in `cache.walk()` order in every picture, so the text tree, the DOT
graph, the PNG and the memory map refer to the same nodes by the same names. Only the tree's
public read API is used. Colours (`colours`): red = locked, green = evictable leaf, blue = inner.
"""

from radixkv.memory.tree_text import format_tree, node_names, slot_runs, token_text
from radixkv.tools.viz.colours import EVICTABLE, INNER, LOCKED, ROOT, node_colour
from radixkv.tools.viz.demo import (
    DEMO_ANSWERS,
    DEMO_CHATS,
    DEMO_DECODED,
    DEMO_RUNNING,
    SYSTEM_PROMPT,
    DemoTree,
    build_demo,
    encode_text,
)
from radixkv.tools.viz.dot import to_dot
from radixkv.tools.viz.memory_map import (
    OWNER_CONFLICT,
    OWNER_FREE,
    OWNER_RESERVED,
    OWNER_UNOWNED,
    MemoryMap,
    format_memory_map,
    memory_map,
)
from radixkv.tools.viz.pictures import write_pictures
from radixkv.tools.viz.png import render_memory_map_png, render_tree_png
from radixkv.tools.viz.tokenizers import WordTokenizer, encode_chat, load_demo_tokenizer

__all__ = [
    "DEMO_ANSWERS", "DEMO_CHATS", "DEMO_DECODED", "DEMO_RUNNING", "EVICTABLE", "INNER", "LOCKED",
    "OWNER_CONFLICT", "OWNER_FREE", "OWNER_RESERVED", "OWNER_UNOWNED", "ROOT", "SYSTEM_PROMPT",
    "DemoTree", "MemoryMap", "WordTokenizer", "build_demo", "encode_chat", "encode_text",
    "format_memory_map", "format_tree", "load_demo_tokenizer", "memory_map", "node_colour",
    "node_names", "render_memory_map_png", "render_tree_png", "slot_runs", "to_dot", "token_text",
    "write_pictures",
]
