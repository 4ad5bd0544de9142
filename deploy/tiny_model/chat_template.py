"""InternVL's `internvl2_5` conversation template as Jinja chat templates, one per checkpoint layout.

The `internvl2_5` template (OpenGVLab's conversation.py, used by InternVL2.5/3/3.5) is Qwen's ChatML:
    <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n
with InternVL's default system message when the conversation has none.

- original layout: message content is a plain string only. vLLM then inserts its own image placeholder
  (`<image>`, one per image, before the text, joined by newlines) and expands each to
  `<img><IMG_CONTEXT>*N</img>`. A template that wrote the context token itself would break vLLM.
- hf layout: transformers' `InternVLProcessor.apply_chat_template` passes content as a list of parts, so
  the template also renders parts, an image as `<IMG_CONTEXT>\n` (the token the hf processor expands).
Both render the same text for the same conversation, hence the same tokens after image expansion.
"""

DEFAULT_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                          "多模态大语言模型。")

_SYSTEM = ("{%- if messages[0]['role'] != 'system' %}"
           "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\\n' }}"
           "{%- endif %}")
_GENERATION_PROMPT = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"

ORIGINAL_CHAT_TEMPLATE = (
    _SYSTEM
    + "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    + _GENERATION_PROMPT
)

HF_CHAT_TEMPLATE = (
    _SYSTEM
    + "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<IMG_CONTEXT>\\n' }}"
    "{%- elif part['type'] == 'video' %}{{- '<video>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    + _GENERATION_PROMPT
)


def chat_template(layout: str) -> str:
    return ORIGINAL_CHAT_TEMPLATE if layout == "original" else HF_CHAT_TEMPLATE
