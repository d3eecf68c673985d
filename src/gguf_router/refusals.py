"""What each reason the scheduler refuses for says to an HTTP client: status, message (with the
flags and preset keys that change the answer) and Retry-After where waiting helps."""

from __future__ import annotations

from .errors import RouterError, model_not_found, shown
from .scheduling.records import Refused, Why
from .sizes import size_text

RETRY_AFTER = 5  # seconds a client told to come back later is asked to wait


def http_error(refused: Refused) -> RouterError:
    r, queue_timeout = refused.refusal, refused.queue_timeout
    model, detail, f = shown(r.model), r.detail, r.figures
    later = {"Retry-After": str(RETRY_AFTER)}
    match r.why:
        case Why.NOT_FOUND:
            return model_not_found(r.model)
        case Why.NOT_USABLE:
            return RouterError(400, f"model '{model}' is not a usable GGUF: {detail}")
        case Why.NOT_LOADED:
            return RouterError(400, "model is not loaded")
        case Why.FAILED:
            return RouterError(503, f"model '{model}' failed: {detail}")
        case Why.NEVER_FITS:
            beside = f" beside the pinned models' {size_text(f['pinned'])}" if f["pinned"] else ""
            return RouterError(503, f"model '{model}' needs an estimated {size_text(f['need'])}{beside}, more than "
                               f"the memory budget of {size_text(f['budget'])} (--memory-budget): lower its context "
                               f"(preset key ctx-size) or raise the budget")
        case Why.NEVER_FITS_DEVICE:
            if f["pinned"] and f["exclusive"]:
                return RouterError(503, f"model '{model}' can only run on device {detail}, which a pinned model "
                                   "holds (an RPC server serves one model at a time): unpin it (preset key pin) or "
                                   "place this model elsewhere (preset key device)")
            where = f"every device it may run on, closest {detail}" if f["choices"] > 1 else f"device {detail}"
            beside = f" beside the pinned models' {size_text(f['pinned'])}" if f["pinned"] else ""
            return RouterError(503, f"model '{model}' needs {size_text(f['need'])}{beside} on {where}, more than its "
                               f"budget of {size_text(f['budget'])} (--device-budget {detail}:SIZE, or "
                               "--device-reserve): offload fewer layers (preset key n-gpu-layers), lower its context "
                               "(ctx-size), or raise the device's budget")
        case Why.QUEUE_FULL:
            return RouterError(503, f"too many requests are waiting for models to load ({f['waiting']}, "
                               f"--queue-max {f['limit']}); try again later", headers=later)
        case Why.QUEUE_TIMEOUT:
            return RouterError(503, f"model '{model}' was not loaded within the queue timeout of {queue_timeout:g} s "
                               "(--queue-timeout); try again later", headers=later)
        case Why.LEFT_QUEUE:
            return RouterError(503, f"model '{model}' was not loaded: {detail}")
        case Why.LOAD_FAILED:
            return RouterError(503, f"model '{model}' failed to load: {detail}")
        case Why.STOPPED_LOADING:
            return RouterError(503, f"model '{model}' was unloaded while loading")
        case Why.NOT_RESTARTED:
            return RouterError(503, f"model '{model}' was not restarted: {detail}")
        case Why.ALREADY_RUNNING:
            return RouterError(400, "model is already running")
        case Why.NOT_RUNNING:
            return RouterError(400, "model is not running")
    raise AssertionError(r.why)
