// The pricing specialist's job (the sales-support example of the design): a quote from the catalogue, with the
// customer tier's discount on the subtotal and a volume discount on large lines. Money is in integer cents.
'use strict';

const TIERS = ['standard', 'silver', 'gold', 'platinum'];

const INPUT_SCHEMA = {
  $schema: 'http://json-schema.org/draft-07/schema#',
  type: 'object',
  required: ['customer_tier', 'items'],
  additionalProperties: false,
  properties: {
    customer_tier: { enum: TIERS, description: 'The customer tier, which sets the discount on the subtotal.' },
    items: {
      type: 'array',
      minItems: 1,
      maxItems: 100,
      items: {
        type: 'object',
        required: ['sku', 'quantity'],
        additionalProperties: false,
        properties: {
          sku: { type: 'string', minLength: 1, maxLength: 64 },
          quantity: { type: 'integer', minimum: 1, maximum: 100000 },
        },
      },
    },
  },
};

const LINE_SCHEMA = {
  type: 'object',
  required: ['sku', 'name', 'quantity', 'unit_price_cents', 'volume_discount_percent', 'line_total_cents'],
  properties: {
    sku: { type: 'string' },
    name: { type: 'string' },
    quantity: { type: 'integer' },
    unit_price_cents: { type: 'integer' },
    volume_discount_percent: { type: 'integer' },
    line_total_cents: { type: 'integer' },
  },
};

const TOTAL_SCHEMA = {
  type: 'object',
  required: ['currency', 'customer_tier', 'subtotal_cents', 'tier_discount_percent', 'discount_cents',
    'total_cents'],
  properties: {
    currency: { type: 'string' },
    customer_tier: { enum: TIERS },
    subtotal_cents: { type: 'integer' },
    tier_discount_percent: { type: 'integer' },
    discount_cents: { type: 'integer' },
    total_cents: { type: 'integer' },
  },
};

/** Invoke's answer: the total's fields and every line. InvokeStream sends {line} chunks, then {total}. */
const OUTPUT_SCHEMA = {
  $schema: 'http://json-schema.org/draft-07/schema#',
  ...TOTAL_SCHEMA,
  required: [...TOTAL_SCHEMA.required, 'lines'],
  properties: { ...TOTAL_SCHEMA.properties, lines: { type: 'array', items: LINE_SCHEMA } },
};

class QuoteError extends Error {
  /** violations: {field path: why}, as the mesh reports them (BadRequest). */
  constructor(message, violations) {
    super(message);
    this.violations = violations;
  }
}

/** The input's problems the JSON Schema cannot see (or all of them, when the agent is called directly). */
function check(input, catalogue) {
  const violations = {};
  if (input === null || typeof input !== 'object' || Array.isArray(input)) {
    throw new QuoteError('the input must be a JSON object with customer_tier and items', { input: 'not an object' });
  }
  if (!TIERS.includes(input.customer_tier)) {
    violations['input.customer_tier'] = `must be one of ${TIERS.join(', ')}`;
  }
  if (!Array.isArray(input.items) || input.items.length === 0) {
    violations['input.items'] = 'must be a non-empty list of {sku, quantity}';
  } else {
    input.items.forEach((item, i) => {
      const sku = item && item.sku;
      if (typeof sku !== 'string' || !(sku in catalogue.products)) {
        violations[`input.items[${i}].sku`] =
          `unknown SKU ${JSON.stringify(sku)}; the catalogue has ${Object.keys(catalogue.products).join(', ')}`;
      }
      const q = item && item.quantity;
      if (!Number.isInteger(q) || q < 1) violations[`input.items[${i}].quantity`] = 'must be a whole number >= 1';
    });
  }
  const fields = Object.keys(violations);
  if (fields.length) {
    throw new QuoteError(`cannot quote: ${fields.map((f) => `${f} ${violations[f]}`).join('; ')}`, violations);
  }
}

function percentOf(cents, percent) {
  return Math.round((cents * percent) / 100);
}

/** The quote's line items, one by one, then {total}: what InvokeStream streams and Invoke gathers. */
function* quote(input, catalogue) {
  check(input, catalogue);
  let subtotal = 0;
  for (const { sku, quantity } of input.items) {
    const product = catalogue.products[sku];
    const gross = product.unit_price_cents * quantity;
    const volume = quantity >= catalogue.volume_discount.min_quantity ? catalogue.volume_discount.percent : 0;
    const lineTotal = gross - percentOf(gross, volume);
    subtotal += lineTotal;
    yield {
      line: {
        sku, name: product.name, quantity, unit_price_cents: product.unit_price_cents,
        volume_discount_percent: volume, line_total_cents: lineTotal,
      },
    };
  }
  const tierPercent = catalogue.tier_discounts[input.customer_tier];
  const discount = percentOf(subtotal, tierPercent);
  yield {
    total: {
      currency: catalogue.currency, customer_tier: input.customer_tier, subtotal_cents: subtotal,
      tier_discount_percent: tierPercent, discount_cents: discount, total_cents: subtotal - discount,
    },
  };
}

/** The whole quote as one answer (Invoke). */
function quoteAll(input, catalogue) {
  const lines = [];
  let total = null;
  for (const part of quote(input, catalogue)) {
    if (part.line) lines.push(part.line);
    else total = part.total;
  }
  return { ...total, lines };
}

module.exports = { INPUT_SCHEMA, OUTPUT_SCHEMA, QuoteError, quote, quoteAll };
