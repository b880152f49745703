"""Per-family handles: what `mmjax.load` returns, and how it treats bad arguments.

On the shipped latent diffusion model: loading an export reads files only, and every check
here fails before anything is compiled, so this file stays in the fast lane.
"""

import os
import warnings

import numpy as np
import pytest

import mmjax
from mmjax.handles import HANDLES, Classifier, CLIPModel, DiffusionModel, GANModel, VAEModel
from tests.helpers import REPO

SHIPPED = os.path.join(REPO, "pretrained", "ldm_shapes")


@pytest.fixture(scope="module")
def ldm():
    return mmjax.load(SHIPPED)


def test_every_family_has_a_handle_with_its_own_methods():
    from mmjax import zoo

    assert set(HANDLES) == set(zoo.FAMILIES)
    assert DiffusionModel.method_names() == ["attention_maps", "edit", "generate", "img2img", "inpaint",
                                             "interpolate_prompts"]
    assert VAEModel.method_names() == ["decode", "edit", "encode", "generate", "interpolate_images", "reconstruct"]
    assert "invert" in GANModel.method_names() and "interpolate_latents" in GANModel.method_names()
    assert CLIPModel.method_names() == ["embed_images", "embed_texts", "similarity", "zero_shot"]
    assert Classifier.method_names() == ["classify", "features"]
    # Every method a handle offers is backed by its family's abilities (or by other methods).
    for family, handle in HANDLES.items():
        assert handle.method_names(), family


def test_the_shipped_model_loads_as_a_diffusion_handle(ldm):
    assert isinstance(ldm, DiffusionModel) and ldm.step == 6000 and ldm.image_size == 32
    assert "generate" in ldm.methods and "interpolate" not in ldm.methods  # the old name is hidden
    with pytest.raises(NotImplementedError, match="cannot classify"):
        ldm.classify(np.zeros((1, 32, 32, 3), np.uint8))
    assert not hasattr(ldm, "reconstruct")
    with pytest.raises(AttributeError):
        ldm.no_such_thing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mmjax.LoadedModel is mmjax.handles.Model
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


@pytest.mark.parametrize("kwargs, message", [
    ({"num": 0}, "num must be a positive integer"),
    ({"num": 2.5}, "num must be a positive integer"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"guidance": float("inf")}, "guidance must be a finite number"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"sampler": "heun"}, "sampler must be one of"),
    ({"eta": -1.0}, "eta must be >= 0"),
    ({"seed": "1"}, "seed must be an integer"),
])
def test_bad_generate_arguments_name_the_argument(ldm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ldm.generate(["a red circle"], **kwargs)


def test_bad_prompts_and_images_name_what_was_given(ldm):
    for prompts in ([], None, [1, 2], ["a", None]):
        with pytest.raises(ValueError, match="prompts must be a string or a non-empty list of strings"):
            ldm.generate(prompts)
    with pytest.raises(ValueError, match=r"got 20x20 \(shape \(2, 20, 20\)\)"):
        ldm.img2img(np.zeros((2, 20, 20), np.uint8), "a red circle")
    with pytest.raises(ValueError, match=r"got shape \(2, 32, 32, 4\)"):
        ldm.img2img(np.zeros((2, 32, 32, 4), np.uint8), "a red circle")
    with pytest.raises(ValueError, match="strength must be a number in"):
        ldm.img2img(np.zeros((1, 32, 32, 3), np.uint8), "a red circle", strength=0.0)
    with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
        ldm.img2img(np.zeros((3, 32, 32, 3), np.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="masks must be"):
        ldm.inpaint(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((16, 16)), "a red circle")


def test_greyscale_batches_become_rgb(ldm):
    grey = np.arange(2 * 32 * 32, dtype=np.uint32).reshape(2, 32, 32).astype(np.uint8)
    for given in (grey, grey[..., None]):
        x = np.asarray(ldm._images(given))
        assert x.shape == (2, 32, 32, 3)
        np.testing.assert_array_equal(x[..., 0], x[..., 2])
    assert ldm._images(grey[0]).shape == (1, 32, 32, 3)  # one greyscale image
    assert ldm._images(np.zeros((32, 32, 3), np.uint8)).shape == (1, 32, 32, 3)  # one RGB image


def test_load_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        mmjax.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="one step"):
        mmjax.load(SHIPPED, step=3)
    import json
    import shutil

    for change, message in ((lambda c: c.update(family="unet"), "unknown family 'unet'"),
                            (lambda c: c.update(variant="huge"), "unknown diffusion variant 'huge'"),
                            (lambda c: c["model"].update(base_channels=32), "do not fit")):
        copy = tmp_path / f"copy{len(os.listdir(tmp_path))}"
        shutil.copytree(SHIPPED, copy)
        with open(copy / "config.json") as f:
            config = json.load(f)
        change(config)
        with open(copy / "config.json", "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match=message):
            mmjax.load(str(copy))
