"""Speed parts of local decoding: batched greedy decoding, the shared prompt prefix, the static cache,
packed weights."""
