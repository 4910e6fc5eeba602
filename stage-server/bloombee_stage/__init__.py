"""BloomBee data plane: stage servers, wire format, codecs and the gateway."""
