"""The HTTP surface: one APIRouter per area. Routes validate, delegate to the area's serving module
and an engine, and shape the answer; no model code here."""

from server.api import adapters, admin, chat, health, images, models, openai, prometheus

ROUTERS = (health.router, prometheus.router, models.router, images.router, chat.router, openai.router, admin.router,
           adapters.router)
ADMIN_ROUTERS = (admin.router, adapters.router)  # off (404) without LOOPSTACK_ADMIN_TOKEN
