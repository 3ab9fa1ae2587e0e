"""An agent that calls LLM providers with the real SDKs (openai, anthropic), configured by
nothing but the environment agentd gives it. Prints what it got back, a line per call."""
import anthropic
import openai

chat = openai.OpenAI()
reply = chat.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "one two"}])
print("chat", reply.choices[0].message.content, reply.usage.prompt_tokens)
stream = chat.chat.completions.create(model="gpt-test", stream=True,
                                      messages=[{"role": "user", "content": "a b c"}])
chunks = list(stream)
print("chat-stream", "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip(),
      "usage-seen" if any(c.usage for c in chunks) else "no-usage")
events = chat.responses.create(model="gpt-test", input="x y z w", stream=True)
completed = [e for e in events if e.type == "response.completed"][0]
print("responses-stream", completed.response.usage.output_tokens)
claude = anthropic.Anthropic()
message = claude.messages.create(model="claude-test", max_tokens=50,
                                 messages=[{"role": "user", "content": "p q"}])
print("messages", message.content[0].text, message.usage.output_tokens)
with claude.messages.stream(model="claude-test", max_tokens=50,
                            messages=[{"role": "user", "content": "r s t"}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
print("messages-stream", text, final.usage.output_tokens)
