"""Gateway service: an OpenAI/Anthropic-compatible proxy that meters, attributes and enforces."""
