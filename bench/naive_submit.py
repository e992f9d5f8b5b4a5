"""The baseline of bench/submit.py: the submit handler a first version would write. pydantic validation
(sdfleet's own JobCreate), one SQLAlchemy ORM insert into sdfleet's own `jobs` table, a Celery send_task to
the same Redis, 202 with the ID. No auth, no admission, no defaults, no queue position.

    uvicorn --factory bench.naive_submit:create_app   (SDFLEET_DATABASE_URL, SDFLEET_REDIS_URL)
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI

from shared.db import session_factory
from shared.jobs import JobCreate
from shared.models import Job, utcnow
from shared.queue import GENERATE_TASK, make_celery, queue_name
from shared.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    sessions = session_factory(settings.database_url)
    celery = make_celery(settings)
    app = FastAPI()

    @app.post("/v1/jobs", status_code=202)
    def submit(job: JobCreate) -> dict:
        job_id, delivery = str(uuid.uuid4()), str(uuid.uuid4())
        with sessions.begin() as session:
            session.add(Job(id=job_id, status="queued", model=job.model, prompt=job.prompt,
                            negative_prompt=job.negative_prompt, width=job.width or 512, height=job.height or 512,
                            steps=job.steps or 20, guidance_scale=job.guidance_scale or 7.5, seed=job.seed or 0,
                            num_images=job.num_images, priority=job.priority, delivery_id=delivery,
                            enqueued_at=utcnow(), attempts=0, handoffs=0, webhook_attempts=0))
        celery.send_task(GENERATE_TASK, args=[job_id, delivery], task_id=delivery,
                         queue=queue_name(job.model, 2 << 30))
        return {"id": job_id, "status": "queued"}

    return app
