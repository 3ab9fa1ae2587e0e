"""A test LLM provider (for the tests, not the product): OpenAI's Chat Completions and
Responses and Anthropic's Messages, whole or streamed (server-sent events), with usage as
each API gives it. Only the key in argv[1] is accepted. Prints its port, then serves.

Every answer uses 7 input tokens (2 of them cached) and as many output tokens as words in the
last message's text. The first request for the model `busy` is answered 429 with
`Retry-After: 1`. `GET /arrivals` lists each request's model and arrival time.
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = sys.argv[1]
ARRIVALS = []
LOCK = threading.Lock()


class Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream(self, events):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for name, data in events:
            text = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
            chunk = text.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def do_GET(self):
        if self.path == "/arrivals":
            with LOCK:
                return self.answer(200, ARRIVALS)
        self.answer(404, {"error": {"message": f"no {self.path}"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        with LOCK:
            ARRIVALS.append([body.get("model", ""), time.time()])
            busy = body.get("model") == "busy" and sum(1 for m, _ in ARRIVALS if m == "busy") == 1
        if busy:
            data = json.dumps({"error": {"message": "rate limited", "type": "rate_limit_error"}}).encode()
            self.send_response(429)
            self.send_header("retry-after", "1")
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        anthropic = self.path == "/v1/messages"
        key = self.headers.get("x-api-key") if anthropic else self.headers.get("authorization", "")[7:]
        if key != KEY:
            return self.answer(401, {"error": {"message": f"bad key {key!r}", "type": "invalid_api_key"}})
        model = body.get("model", "")
        messages = body.get("messages") or [{"content": body.get("input", "")}]
        words = str(messages[-1].get("content", "")).split()
        output = len(words)
        text = " ".join(words[::-1])
        if self.path == "/v1/chat/completions":
            usage = {"prompt_tokens": 7, "completion_tokens": output, "total_tokens": 7 + output,
                     "prompt_tokens_details": {"cached_tokens": 2}}
            if not body.get("stream"):
                return self.answer(200, {"id": "c1", "object": "chat.completion", "model": model,
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": text}}],
                                         "usage": usage})
            include = (body.get("stream_options") or {}).get("include_usage")
            chunks = []
            for word in text.split():
                chunk = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                         "choices": [{"index": 0, "delta": {"content": word + " "}}]}
                if include:
                    chunk["usage"] = None
                chunks.append((None, json.dumps(chunk, separators=(",", ":"))))
            if include:
                chunks.append((None, json.dumps({"id": "c1", "object": "chat.completion.chunk", "model": model,
                                                 "choices": [], "usage": usage}, separators=(",", ":"))))
            chunks.append((None, "[DONE]"))
            return self.stream(chunks)
        if self.path == "/v1/responses":
            usage = {"input_tokens": 7, "output_tokens": output, "total_tokens": 7 + output,
                     "input_tokens_details": {"cached_tokens": 2}}
            response = {"id": "r1", "object": "response", "model": model, "status": "completed",
                        "output": [{"type": "message", "role": "assistant",
                                    "content": [{"type": "output_text", "text": text}]}],
                        "usage": usage}
            if not body.get("stream"):
                return self.answer(200, response)
            return self.stream([("response.output_text.delta", json.dumps({"type": "response.output_text.delta", "delta": text})),
                                ("response.completed", json.dumps({"type": "response.completed", "response": response}))])
        if anthropic:
            usage = {"input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": output}
            if not body.get("stream"):
                return self.answer(200, {"id": "m1", "type": "message", "role": "assistant", "model": model,
                                         "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                         "usage": usage})
            return self.stream([
                ("message_start", json.dumps({"type": "message_start", "message": {
                    "id": "m1", "type": "message", "role": "assistant", "model": model, "content": [],
                    "usage": {"input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": 1}}})),
                ("content_block_start", json.dumps({"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}})),
                ("content_block_delta", json.dumps({"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": text}})),
                ("content_block_stop", json.dumps({"type": "content_block_stop", "index": 0})),
                ("message_delta", json.dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                              "usage": {"output_tokens": output}})),
                ("message_stop", json.dumps({"type": "message_stop"})),
            ])
        self.answer(404, {"error": {"message": f"no {self.path}"}})


server = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
print(server.server_address[1], flush=True)
server.serve_forever()
