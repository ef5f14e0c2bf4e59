"""Using trained models: decoding (generate.py, config.py) and chatting (chat.py); no training code."""
