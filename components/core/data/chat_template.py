"""The chat template alignflow ships: ChatML, with tools.

It is the embedded tokenizer's template, the one a template-less user model is given (bootstrap), and the fallback
for a tokenizer without one (core/data/tokens.render).
"""

# ChatML: what the embedded tokenizer ships, and the fallback for a tokenizer without a chat template. Tools as
# Qwen2.5 / Hermes render them, compactly: a `tools` list becomes a system turn "Tools: name(arg, ...)" (merged
# with a leading system message), an assistant turn's `tool_calls` become
# `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` after its content, and a tool result is a `tool` turn.
# A conversation without tools renders exactly as plain ChatML.
CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n' }}{% endif %}{{ 'Tools:' }}"
    "{% for tool in tools %}{% set f = tool['function'] if tool['function'] is defined else tool %}"
    "{{ ' ' + f['name'] + '(' + ((f['parameters']['properties'] if f['parameters'] is defined else {}) | list"
    " | join(', ')) + ')' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{% set f = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{% if f['arguments'] is string %}{{ f['arguments'] }}{% else %}{{ f['arguments'] | tojson }}{% endif %}"
    "{{ '}</tool_call>' }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
