"""Request, response and error bodies, by area: common (errors, strict requests, the model list),
images, chat, openai."""
