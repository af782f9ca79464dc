"""The manifest's JSON Schema as Python data: modules run through AnsiballZ, which ships only the
collection's ``.py`` files, so the schema the engine validates with lives here.  ``manifest.schema.json``
beside it is the published copy (docs/manifest.md); tests/unit/test_manifest_schema.py checks they are equal.
"""

SCHEMA = {
    '$schema': 'http://json-schema.org/draft-07/schema#',
    '$id': (
        'https://github.com/vdisk/vdisk/plugins/module_utils/vdisk/schema/manifest.schema.json'
    ),
    'title': 'vdisk manifest',
    'description': (
        'Disk images kept in git and applied by `vdisk plan` / `vdisk apply`. '
        "Relative paths are relative to the manifest's directory. The same image "
        'fields are the options of the vdisk.images.images role '
        "(roles/images/meta/argument_specs.yml). Format names and each format's "
        "create options are checked against the engine's drivers (`vdisk create -f "
        'FMT -o help`).'
    ),
    'type': 'object',
    'additionalProperties': False,
    'required': ['version', 'images'],
    'patternProperties': {
        '^x-': {
            'description': (
                'Extension keys, ignored: a place for YAML anchors that images merge '
                '(<<: *name).'
            ),
        },
    },
    'properties': {
        'version': {
            'description': 'Manifest format version.',
            'enum': [1],
        },
        'defaults': {
            'description': 'Fields merged under every image; `options` merge key by key.',
            'allOf': [
                {
                    '$ref': '#/definitions/fields',
                },
            ],
            'not': {
                'required': ['path'],
                'x-error': 'path is not taken in defaults: every image names its own',
            },
        },
        'allow_paths': {
            'description': (
                "Directories (relative to the manifest's directory) outside it that "
                'images, sources and backing files may be in.'
            ),
            'type': 'array',
            'items': {
                'type': 'string',
                'minLength': 1,
            },
        },
        'images': {
            'description': (
                'The images, in any order: backing files and sources are applied '
                'before the images that use them.'
            ),
            'type': 'array',
            'items': {
                '$ref': '#/definitions/image',
            },
        },
    },
    'definitions': {
        'size': {
            'description': (
                "Bytes, or a number with qemu-img's binary suffixes k, M, G, T, P, E "
                '(8G, 512M, 1.5T).'
            ),
            'x-error': 'expected a size such as 8G, 512M or 1048576 (suffixes k, M, G, T, P, E)',
            'type': ['string', 'integer'],
            'minimum': 0,
            'pattern': (
                '^\\s*(0[xX][0-9a-fA-F]+|[0-9]+(\\.[0-9]*)?|\\.[0-9]+)\\s*[bBkKmMgGtTpPeE]?\\s*$'
            ),
        },
        'fields': {
            'type': 'object',
            'additionalProperties': False,
            'properties': {
                'path': {
                    'description': "The image file; relative to the manifest's directory.",
                    'type': 'string',
                    'minLength': 1,
                },
                'state': {
                    'description': 'present: the image exists as described; absent: the file is deleted.',
                    'type': 'string',
                    'enum': ['present', 'absent'],
                },
                'format': {
                    'description': 'Image format (qcow2, raw, qed, vdi, vpc, parallels); default qcow2.',
                    'type': 'string',
                    'minLength': 1,
                },
                'size': {
                    'description': (
                        'Virtual size; a larger size grows the image, a smaller one '
                        'needs allow_shrink.'
                    ),
                    '$ref': '#/definitions/size',
                },
                'preallocation': {
                    'description': (
                        'Preallocation when the image is made or grown (off, '
                        'metadata, falloc, full).'
                    ),
                    'type': ['string', 'boolean'],
                },
                'options': {
                    'description': (
                        "The format's create options (cluster_size, lazy_refcounts, "
                        'compat, ...).'
                    ),
                    'type': 'object',
                },
                'backing_file': {
                    'description': (
                        "Backing file as stored in the image: relative to the image's "
                        'directory.'
                    ),
                    'type': 'string',
                    'minLength': 1,
                },
                'backing_format': {
                    'description': 'Format of the backing file.',
                    'type': 'string',
                    'minLength': 1,
                },
                'snapshots': {
                    'description': (
                        'Internal snapshots that exist afterwards; others are kept '
                        'unless prune_snapshots.'
                    ),
                    'type': 'array',
                    'items': {
                        'type': ['string', 'integer'],
                    },
                },
                'prune_snapshots': {
                    'description': 'Delete the snapshots that are not listed.',
                    'type': 'boolean',
                },
                'source': {
                    'description': (
                        'Image whose content a new image gets (converted) when the '
                        'file is made: a local file, or an http or https URL (with '
                        'source_checksum), downloaded when applying.'
                    ),
                    'type': 'string',
                    'minLength': 1,
                },
                'source_checksum': {
                    'description': (
                        'Checksum of the file at a URL source, required with one: '
                        'sha256:HEX or sha512:HEX. The download is verified before it '
                        'is converted.'
                    ),
                    'x-error': 'expected sha256:HEX (64 hex digits) or sha512:HEX (128 hex digits)',
                    'type': 'string',
                    'pattern': '^(sha256:[0-9a-fA-F]{64}|sha512:[0-9a-fA-F]{128})$',
                },
                'source_format': {
                    'description': 'Format of source; probed when omitted.',
                    'type': 'string',
                    'minLength': 1,
                },
                'compress': {
                    'description': 'Compress the content converted from source.',
                    'type': 'boolean',
                },
                'allow_shrink': {
                    'description': (
                        'Allow a smaller size to shrink the image (data past the end '
                        'is lost).'
                    ),
                    'type': 'boolean',
                },
                'recreate': {
                    'description': (
                        'Replace an image whose format or fixed options differ (its '
                        'content is lost).'
                    ),
                    'type': 'boolean',
                },
                'encryption': {
                    'description': (
                        'Encrypt the image (format luks, or qcow2 with LUKS encryption). '
                        'Fixed when the image is made: a plain image is not encrypted in '
                        'place (nor the reverse). The passphrase is read from '
                        'passphrase_file when an action needs it; secrets are never '
                        'written in a manifest.'
                    ),
                    'type': 'object',
                    'additionalProperties': False,
                    'properties': {
                        'format': {
                            'description': 'Encryption format.',
                            'type': 'string',
                            'enum': ['luks'],
                        },
                        'passphrase_file': {
                            'description': (
                                "File holding the passphrase (relative to the manifest's "
                                'directory); one trailing newline is removed. Keep it mode '
                                '0600, out of git.'
                            ),
                            'type': 'string',
                            'minLength': 1,
                        },
                        'cipher_alg': {
                            'description': (
                                "Cipher algorithm of a new image (qemu-img's cipher-alg; "
                                'default aes-256).'
                            ),
                            'type': 'string',
                        },
                        'cipher_mode': {
                            'description': 'Cipher mode of a new image (cipher-mode; default xts).',
                            'type': 'string',
                        },
                        'hash_alg': {
                            'description': (
                                'Hash of the key derivation of a new image (hash-alg; default '
                                'sha256).'
                            ),
                            'type': 'string',
                        },
                        'iter_time': {
                            'description': (
                                'Milliseconds of PBKDF2 when the image is made (iter-time; '
                                'default 2000).'
                            ),
                            'type': 'integer',
                            'minimum': 1,
                        },
                    },
                },
                'owner': {
                    'description': 'Owner of the image file (name or uid).',
                    'type': ['string', 'integer'],
                },
                'group': {
                    'description': 'Group of the image file (name or gid).',
                    'type': ['string', 'integer'],
                },
                'mode': {
                    'description': (
                        'Permissions of the image file: an octal string such as '
                        "'0640', or an octal number with a leading 0 (0640); a decimal "
                        'number such as 640 is refused.'
                    ),
                    'type': ['string', 'integer'],
                },
            },
        },
        'image': {
            'allOf': [
                {
                    '$ref': '#/definitions/fields',
                },
            ],
            'required': ['path'],
        },
    },
}
