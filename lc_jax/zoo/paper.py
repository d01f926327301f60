"""The 51 ResNet-50 models of Gavrikov et al. 2024 (arXiv 2410.14470), as its released results
name them.

Sources, layouts and accuracies follow the paper's loader (paulgavrikov/layer_criticality @
c123a9f, code/models/model_zoo.py); top-1 is on the paper's 10,000-image validation subset, and
in `full_val_top1` on the full validation set (the paper's notebook). No checkpoint was opened to
write this table: what the loader and upstream code did not pin down is marked 'unconfirmed'.
"""

from __future__ import annotations

from lc_jax.constants import NO_MEAN, NO_STD
from lc_jax.zoo.entries import Entry, gdrive, hf, url

_HF_MAIN = ("HF revision 'main': no commit of this repository is known (unconfirmed which "
            'commit the paper used); the file is pinned by its recorded sha256 (trust on first '
            'use).')


def _timm(tag: str, category: str, method: str, top1: float, full: float, notes: str = ''
          ) -> Entry:
  model_id = 'tv_resnet50' if tag == 'tv_in1k' else f'resnet50.{tag}'
  return Entry(model_id, category, method,
               (hf(f'timm/resnet50.{tag}', 'model.safetensors', 'main'),), 'timm', top1, full,
               notes=' '.join(filter(None, [notes, _HF_MAIN])))


_TIMM = (
    _timm('tv_in1k', 'baseline', 'torchvision V1 supervised recipe (IMAGENET1K_V1)', 76.29, 76.15,
          'The paper asked timm for the deprecated alias tv_resnet50 = resnet50.tv_in1k; same '
          'weights as https://download.pytorch.org/models/resnet50-0676ba61.pth.'),
    _timm('a1_in1k', 'training_recipes', 'timm ResNet Strikes Back A1', 80.63, 80.10,
          "timm's eval config is bicubic, crop 0.95; the paper used bilinear resize 256, crop "
          '224.'),
    _timm('a1h_in1k', 'training_recipes', 'timm ResNet Strikes Back A1h', 80.33, 80.10,
          'Trained at 176 px (test size 224).'),
    _timm('a2_in1k', 'training_recipes', 'timm ResNet Strikes Back A2', 80.06, 79.80),
    _timm('a3_in1k', 'training_recipes', 'timm ResNet Strikes Back A3', 78.07, 77.55,
          'Trained at 160 px (test size 224).'),
    _timm('b1k_in1k', 'training_recipes', 'timm B1k recipe', 79.39, 79.16),
    _timm('b2k_in1k', 'training_recipes', 'timm B2k recipe', 79.72, 79.27),
    _timm('c1_in1k', 'training_recipes', 'timm C1 recipe', 80.06, 79.76),
    _timm('c2_in1k', 'training_recipes', 'timm C2 recipe', 80.45, 79.92),
    _timm('d_in1k', 'training_recipes', 'timm D recipe', 79.91, 79.89,
          'Plain resnet50 with the tag d (not the resnet50d architecture).'),
)

_TORCHVISION = (
    Entry('tv2_resnet50', 'training_recipes', 'torchvision new recipe (IMAGENET1K_V2)',
          (url('https://download.pytorch.org/models/resnet50-11ad3fa6.pth'),), 'torchvision',
          80.89, 80.34, init_scheme='torchvision_resnet',
          notes='The paper loaded it through torch.hub (pytorch/vision, ResNet50_Weights.'
                'IMAGENET1K_V2), which checks the sha256 prefix 11ad3fa6 in the name; the full '
                'sha256 is not known here (trust on first use). Same file as timm '
                'resnet50.tv2_in1k. The V2 recipe is normally evaluated at resize 232; the paper '
                'used 256.'),
)

_GD_UNCONFIRMED = 'Container of the released file unconfirmed (the loader takes state_dict, ' \
                  'model_state_dict, online_backbone or model, and strips module.).'


def _gd(model_id: str, file_id: str, method: str, top1: float, full: float, notes: str,
        category: str = 'augmentation', recipe: str = 'state_dict', **kwargs) -> Entry:
  return Entry(model_id, category, method, (gdrive(model_id, file_id),), recipe, top1, full,
               notes=notes, **kwargs)


_TSBIAS = ('Trained with MixBatchNorm2d; the auxiliary BN (aux_bn keys) is dropped and the main '
           'BN kept. Provenance of this Google Drive copy unconfirmed.')

_GDRIVE = (
    _gd('resnet50_augmix_180ep', '1z-1V3rdFiwqSECz7Wkmn4VJVefJGJGiF', 'AugMix, 180 epochs',
        77.85, 77.53, 'Same file id as the google-research/augmix README; upstream saves '
        "{'state_dict': ...} from a DataParallel net (module. keys)."),
    _gd('resnet50_deepaugment', '1DPRElQnBG66nd7GUphVm1t-5NroL7t7k', 'DeepAugment', 77.25, 77.65,
        _GD_UNCONFIRMED + ' Full-val top-1 77.65 is the paper notebook\'s value; '
        'biases_vs_generalization lists 76.65 (the notebook value looks off).'),
    _gd('resnet50_deepaugment_augmix', '1QKmc_p6-qDkh51WvsaS9HKFv8bX5jLnP',
        'DeepAugment + AugMix', 76.11, 75.80, _GD_UNCONFIRMED),
    _gd('resnet50_pixmix_90ep', '1_i45yvC88hos50QjkoD97OgbDGreKdp9', 'PixMix, 90 epochs', 77.62,
        77.36, _GD_UNCONFIRMED + ' The upstream README links only a Drive folder; this file id '
        'is not verifiable (unconfirmed).'),
    _gd('resnet50_pixmix_180ep', '1cgKYXDym3wgquf-4hwr_Ra3qje6GNHPH', 'PixMix, 180 epochs',
        78.57, 78.09, _GD_UNCONFIRMED),
    _gd('resnet50_noisymix', '1Na79fzPZ0Azg01h6kGn1Xu5NoWOElSuG', 'NoisyMix', 77.61, 77.05,
        'A re-saved dict with state_dict and module. keys (upstream saved the whole module); '
        'same file id as RobustBench Erichson2022NoisyMix_new.'),
    _gd('resnet50_tsbias_tbias', '1tFy2Q28rAqqreaS-27jifpyPzlohKDPH',
        'shape-texture training (Li et al., ICLR 2021), texture-biased', 75.33, 75.27, _TSBIAS,
        recipe='aux_bn'),
    _gd('resnet50_tsbias_sbias', '1p0fZ9rU-J1v943tA7PlNMLuDXk_1Iy3K',
        'shape-texture training (Li et al., ICLR 2021), shape-biased', 76.76, 76.21, _TSBIAS,
        recipe='aux_bn'),
    _gd('resnet50_tsbias_debiased', '1r-OSfTtrlFhB9GPiQXUE1h6cqosaBePw',
        'shape-texture training (Li et al., ICLR 2021), debiased', 77.23, 76.89,
        _TSBIAS + ' Upstream hosts this model on JHU SharePoint; the Drive copy is third-party.',
        recipe='aux_bn'),
    _gd('resnet50_opticsaugment', '1y0MSlVfzZBKZQEiZF2FCOmsk-91miIHR',
        'OpticsAugment (Mueller et al., ICCVW 2023)', 74.47, 74.22,
        'Upstream saves model_state_dict, probably what this file holds (unconfirmed).'),
    _gd('resnet50_frozen_random', '1IT65JJauql-Jdw-0AjAhEGGApGMVx-VE',
        'frozen random spatial conv filters', 75.04, 74.76,
        'Provenance unconfirmed (most likely Gavrikov & Keuper, arXiv 2301.11360); container '
        'unconfirmed, keys are plain ResNet-50 names. The paper\'s figures leave it out. '
        'Full-val top-1 from biases_vs_generalization (the notebook lacks it).',
        category='freezing'),
    _gd('resnet50_simclrv2', '1fDaMhujPnxo4SYOe4asPqCKQ3XB_sZvj',
        'SimCLRv2 r50_1x_sk0 (TF checkpoint converted to PyTorch) + supervised head', 75.16,
        74.90, "Separius/SimCLRv2-Pytorch convert.py output: {'resnet', 'head'}; only resnet is "
        'used, with its keys remapped. Whether from the pretrained or a finetuned TF checkpoint '
        'is unconfirmed; TF max-pool SAME vs PyTorch padding 1 may differ slightly '
        '(unconfirmed). Inputs are not normalised.',
        category='contrastive', recipe='simclrv2', mean=NO_MEAN, std=NO_STD),
)

_HANGZH = 'https://hangzh.s3-us-west-1.amazonaws.com/others/'
_SIN = 'https://bitbucket.org/robert_geirhos/texture-vs-shape-pretrained-models/raw/'
_SIN_IN = _SIN + '60b770e128fffcbd8562a3ab3546c1a735432d03/'
_FAA = ('Trained with PyTorch-Encoding (Fast-AutoAug-Torch); container of the released file '
        'unconfirmed. Its id has a dot but it is not a timm model.')
_MOCO = ('moco-v3 main_lincls.py checkpoint (state_dict, module. keys) with the linear probe '
         'trained on the frozen backbone.')


def _url(model_id: str, address: str, method: str, top1: float, full: float, notes: str,
         category: str = 'augmentation') -> Entry:
  return Entry(model_id, category, method, (url(address),), 'state_dict', top1, full,
               notes=notes)


_URLS = (
    _url('resnet50_prime',
         'https://zenodo.org/record/5801872/files/ResNet50_ImageNet_PRIME_noJSD.ckpt?download=1',
         'PRIME without JSD (Modas et al., ECCV 2022)', 77.03, 76.91,
         'Container unconfirmed: PRIME trains with PyTorch Lightning, so the file must already '
         'carry torchvision names.'),
    _url('resnet50.autoaugment_270ep', _HANGZH + 'resnet50_aa-0cb27f8e.pth',
         'AutoAugment, 270 epochs', 78.06, 77.50, _FAA),
    _url('resnet50.fastautoaugment_270ep', _HANGZH + 'resnet50_fast_aa-3342410e.pth',
         'Fast AutoAugment, 270 epochs', 78.18, 77.65, _FAA),
    _url('resnet50.randaugment_270ep', _HANGZH + 'resnet50_rand_aug-e38097c7.pth',
         'RandAugment, 270 epochs', 77.69, 77.64, _FAA),
    _url('resnet50_trained_on_SIN', _SIN + '6f41d2e86fc60566f78de64ecff35cc61eb6436f/'
         'resnet50_train_60_epochs-c8e5653e.pth.tar', 'Stylized-ImageNet', 60.66, 60.18,
         'state_dict with module. keys (rgeirhos/texture-vs-shape).'),
    _url('resnet50_trained_on_SIN_and_IN',
         _SIN_IN + 'resnet50_train_45_epochs_combined_IN_SF-2a0d100e.pth.tar',
         'Stylized-ImageNet + ImageNet', 74.72, 74.59,
         'state_dict with module. keys (rgeirhos/texture-vs-shape).'),
    _url('resnet50_trained_on_SIN_and_IN_then_finetuned_on_IN',
         _SIN_IN + 'resnet50_finetune_60_epochs_lr_decay_after_30_start_resnet50_train_45_'
         'epochs_combined_IN_SF-ca06340c.pth.tar',
         'Stylized-ImageNet + ImageNet, then fine-tuned on ImageNet', 77.11, 76.72,
         'state_dict with module. keys (rgeirhos/texture-vs-shape).'),
    _url('resnet50_moco_v3_100ep',
         'https://dl.fbaipublicfiles.com/moco-v3/r-50-100ep/linear-100ep.pth.tar',
         'MoCo v3, 100 epochs + linear probe', 69.43, 68.91, _MOCO, 'contrastive'),
    _url('resnet50_moco_v3_300ep',
         'https://dl.fbaipublicfiles.com/moco-v3/r-50-300ep/linear-300ep.pth.tar',
         'MoCo v3, 300 epochs + linear probe', 73.20, 72.80, _MOCO, 'contrastive'),
    _url('resnet50_moco_v3_1000ep',
         'https://dl.fbaipublicfiles.com/moco-v3/r-50-1000ep/linear-1000ep.pth.tar',
         'MoCo v3, 1000 epochs + linear probe', 74.72, 74.60, _MOCO, 'contrastive'),
)

_DINO = 'https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/'
_SWAV = 'https://dl.fbaipublicfiles.com/deepcluster/'

_SPLIT = (
    Entry('resnet50_dino', 'contrastive', 'DINO v1 + linear probe',
          (url(_DINO + 'dino_resnet50_pretrain.pth'),
           url(_DINO + 'dino_resnet50_linearweights.pth')), 'split', 75.28, 75.28,
          notes='Backbone (torchvision names, no fc) and linear-probe head (module.linear.* -> '
                'fc.*) are separate files; the paper loaded both non-strictly.'),
    Entry('resnet50_swav', 'contrastive', 'SwAV, 800 epochs + linear probe',
          (url(_SWAV + 'swav_800ep_pretrain.pth.tar'),
           url(_SWAV + 'swav_800ep_eval_linear.pth.tar')), 'split', 75.49, 75.31,
          notes='Backbone (module. keys, plus projection_head/prototypes, dropped) and '
                'linear-probe head (module.linear.* -> fc.*) are separate files, loaded '
                "non-strictly. SwAV's probe used std 0.228 for R; the paper used 0.229."),
)

_DIFFUSION = (
    Entry('resnet50_diffusionnoise_fixed_nonoise', 'augmentation',
          'diffusion-style input noise in training (re-implementation of Jaini et al.), '
          'evaluated without noise',
          (hf('paulgavrikov/resnet50.in1k_diffusionnoise_90ep',
              'resnet50_diffusionnoise_nonorm_last.pth', 'main',
              'e7ef27d05c41612f4b9a730beedfd8ce22f971fdab6b7202482d41c47765c2ca'),),
          'diffusionnoise', 67.47, 67.22, NO_MEAN, NO_STD,
          notes="The file's model (keys module.*) wraps the ResNet-50 in a noise front-end that "
                'the paper bypassed. It pickles argparse.Namespace. Trained without input '
                "normalisation. HF revision 'main': no commit known; the sha256 (Git-LFS, "
                '204,827,874 bytes) pins the content.'),
)

# Git-LFS sha256 of madrylab/robust-imagenet-models at HF commit 19f056c (the paper fetched
# https://huggingface.co/madrylab/robust-imagenet-models/resolve/main/<file>).
_MADRY_SHA256 = {
    'l2_eps0': '72d4a99582db5d7fa86c3fd2a089f0bfd6a10f69d635bca51f6ad72ac6b458f0',
    'l2_eps0.01': '53d7a7c09d2733b113e255ac9fc578091f44adb8d00eee274c0e71dd1f4dc41e',
    'l2_eps0.03': 'e375df3bf07bf1360c04b0aff5cc19bb215e850b1af713327c87cf0353a5598f',
    'l2_eps0.05': 'e09d8763fcf825542f07389a1904adf15930451b8661a0de209c3bc39828c2ea',
    'l2_eps0.1': '3298f8cf689e514d096df883ab491a11ee32c3b8d456d674add29d7b50721a43',
    'l2_eps0.25': None,
    'l2_eps0.5': 'a5fc6fcc54946b73af7bd74289b0003cc9d2744fa0ff55c1a3d9fb2bce8fbd30',
    'l2_eps1': '09f5273a568830ae23caf9162a06f4831a920293e0da1801aa182289052dcf90',
    'l2_eps3': '380b14e6f9750bffa1447cf7017f65da4dc5ce71a3dd112f107515dcf7b14d9d',
    'l2_eps5': 'c50db4bbd9a61bc0e0a33290e1f07a79080e16489aa5ada869efc88306f497be',
    'linf_eps0.5': '9612d8096ef5378b4a32746072f72fedcb02c7ff4b747bc7163274f7ec2f0fd8',
    'linf_eps1.0': None,
    'linf_eps2.0': '59f28de783a049cb4d91ba1c0a09c314db2cc4bb1e859566e023f842b02772ac',
    'linf_eps4.0': '9e62216975c111b8081481533b6142dec34be69abe5d90b54d7f860015c263db',
    'linf_eps8.0': 'b907957f8e3ce209816813d8811c682e965a1b0f48455def828d35a4cc2953dc',
}
# 10k-subset and full-val top-1.
_MADRY_TOP1 = {
    'l2_eps0': (76.07, 75.81), 'l2_eps0.01': (75.85, 75.67), 'l2_eps0.03': (76.08, 75.77),
    'l2_eps0.05': (76.16, 75.58), 'l2_eps0.1': (74.81, 74.79), 'l2_eps0.25': (74.11, 74.14),
    'l2_eps0.5': (73.57, 73.17), 'l2_eps1': (70.77, 70.42), 'l2_eps3': (62.89, 62.83),
    'l2_eps5': (56.49, 56.14), 'linf_eps0.5': (74.11, 73.74), 'linf_eps1.0': (72.22, 72.04),
    'linf_eps2.0': (69.37, 69.09), 'linf_eps4.0': (64.21, 63.87), 'linf_eps8.0': (54.68, 54.53),
}
# The Hub resolves only full 40-hex commit ids, and only the short 19f056c is known.
_MADRY_NOTES = ("robustness-library checkpoint (['model'], module.model.* used, the rest "
                "ignored; keys other than module.model.* unconfirmed). HF revision 'main': the "
                'known commit 19f056c is a short id, which the Hub does not resolve (full id '
                'unknown).')


def _madry(name: str) -> Entry:
  norm, eps = name.split('_eps')
  unit = '/255' if norm == 'linf' else ''
  sha256 = _MADRY_SHA256[name]
  notes = _MADRY_NOTES + (' The sha256 (Git-LFS, ~205 MB) pins the content.' if sha256 else
                          ' This file was not in the stored snapshot of that commit: no sha256 '
                          'known (trust on first use).')
  return Entry(f'robust_resnet50_{name}', 'adversarial_training',
               f'{"L2" if norm == "l2" else "Linf"} PGD adversarial training, eps={eps}{unit} '
               '(Salman et al. 2020)',
               (hf('madrylab/robust-imagenet-models', f'resnet50_{name}.ckpt', 'main', sha256),),
               'robustness', *_MADRY_TOP1[name], notes=notes)


_MADRY = tuple(_madry(name) for name in _MADRY_SHA256)

ENTRIES: tuple[Entry, ...] = (_TIMM + _TORCHVISION + _GDRIVE + _URLS + _SPLIT + _DIFFUSION +
                              _MADRY)
