"""What travels between stages and the gateway: frames (header + payload), lossless codecs,
tensors in frames, the step and result messages, and a stage's measured codec profiles.
"""
