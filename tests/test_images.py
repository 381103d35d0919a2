"""POST /generate-image on tiny DiT (pixel and latent) and PixArt models, through the real loaders."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.conftest import assert_error_shape


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def generate(client, **body):
    response = client.post("/generate-image", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_dit_returns_pngs_with_the_reported_settings(client):
    body = generate(client, model="tiny-dit", class_label=3, seed=11, n=2)
    assert body["mode"] == "baseline" and body["steps"] == 4 and body["scheduler"] == "ddim"
    assert body["block_evaluations"] == 4 * 2  # steps x blocks; guidance runs in the same batch
    assert body["seeds"] == [11, 12] and body["guidance_scale"] == 2.0
    images = [decode(b) for b in body["images"]]
    assert [(i.format, i.size, i.mode) for i in images] == [("PNG", (16, 16), "L")] * 2


def test_same_request_and_seed_give_the_same_image(client):
    request = dict(model="tiny-dit", class_label="seven", seed=5, steps=3)
    first, second = generate(client, **request), generate(client, **request)
    other = generate(client, **(request | {"seed": 6}))
    assert first["images"] == second["images"]
    assert first["images"] != other["images"]


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_pixart_prompt_generation_is_deterministic(client, scheduler):
    request = dict(model="tiny-pixart", prompt="a handwritten seven", seed=1, scheduler=scheduler)
    first, second = generate(client, **request), generate(client, **request)
    assert first["images"] == second["images"]
    assert first["scheduler"] == scheduler
    other_prompt = generate(client, **(request | {"prompt": "the digit two"}))
    assert other_prompt["images"] != first["images"]


def test_latent_model_decodes_through_its_vae(client):
    body = generate(client, model="tiny-dit-latent", class_label=1, seed=0)
    image = decode(body["images"][0])
    assert image.mode == "RGB" and image.size == (16, 16)  # 8x8 latents, VAE upsamples 2x


def test_pixart_accepts_non_square_sizes(client):
    body = generate(client, model="tiny-pixart", prompt="the digit 4", width=24, height=16, steps=2)
    assert decode(body["images"][0]).size == (24, 16)


def test_png_response_by_accept_header(client):
    response = client.post("/generate-image", json={"model": "tiny-dit", "class_label": 0, "seed": 2},
                           headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-loopstack-mode"] == "baseline" and response.headers["x-loopstack-seed"] == "2"
    assert Image.open(io.BytesIO(response.content)).size == (16, 16)


def test_png_response_for_several_images_is_a_row(client):
    response = client.post("/generate-image", json={"model": "tiny-dit", "class_label": 0, "n": 3,
                                                    "response_format": "png"})
    assert Image.open(io.BytesIO(response.content)).size == (48, 16)


def test_ilf_mode_without_a_trained_module_is_a_clear_4xx(client):
    response = client.post("/generate-image", json={"model": "tiny-dit", "class_label": 0, "mode": "ilf"})
    error = assert_error_shape(response, 422, "mode")  # like every other invalid field
    assert "ILF" in error["message"]


def test_first_block_cache_is_a_request_setting_that_skips_blocks_and_reports_them(client):
    request = dict(model="tiny-dit", class_label=3, seed=11, n=2)
    plain = generate(client, **request)
    cached = generate(client, **request, first_block_cache=1.0)  # relative change below 1: skips after step 1
    assert plain["first_block_cache"] is None and cached["first_block_cache"] == 1.0
    assert cached["block_evaluations"] < plain["block_evaluations"] == 4 * 2
    assert cached["images"] != plain["images"]
    assert generate(client, **request, first_block_cache=0)["images"] == plain["images"]  # 0: off
    via_openai = client.post("/v1/images/generations", json={"model": "tiny-dit", "prompt": "three", "seed": 11,
                                                             "first_block_cache": 1.0})
    assert via_openai.status_code == 200 and via_openai.json()["loopstack"]["first_block_cache"] == 1.0
    for bad in (1.5, -0.1, "fast"):
        assert_error_shape(client.post("/generate-image", json=request | {"first_block_cache": bad}), 422,
                           "first_block_cache")
