"""attnaudit: can a Transformer's attention explain its outputs?"""
__version__ = "0.1.0"
