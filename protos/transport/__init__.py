"""The embedding data plane: how an image's embedding bytes get from vision_svc into llm_svc's memory.

Control (the Encode call, each image's header, errors, cancellation) always stays on gRPC; the bytes take the
best transport that the two processes agreed on for their connection (`negotiation`):

- shared memory (`shared_memory`): same host, proven by a probe; the receiver creates the segment, the sender
  writes into it, the received tensor views it without a copy;
- a direct socket (`socket_plane`): a TCP connection the receiver opens to the sender's data port; the bytes
  are received straight into a tensor the receiver allocated;
- gRPC inline (`protos.tensors`): chunks in the Encode stream, always available, and what any image falls back
  to when its transport fails on the sender's side.

Each transfer is counted in `metrics` with its transport as a label.
"""
